from fedinspect.cli import main

raise SystemExit(main())
