from collective.cli import main

raise SystemExit(main())
