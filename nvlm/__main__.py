from nvlm.cli import main

raise SystemExit(main())
