"""The shape of a long-running process: `serve(root)` runs a composition root with the event
loop, signals, ready file and drain cap (`serve`); the command every server shares
(`servercmd`); the aiohttp processes' sites and TLS context (`runtime`); a loop as a component
(`lifetime`)."""
