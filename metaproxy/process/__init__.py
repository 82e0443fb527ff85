"""The shape of a long-running process: event loop, TLS context, signals, ready file, drain
(`runtime`), and the command shape every server shares (`servercmd`)."""
