from automixer_ops.cli import main

raise SystemExit(main())
