from qcall.cli import main

raise SystemExit(main())
