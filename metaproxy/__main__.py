from metaproxy.cli import main

raise SystemExit(main())
