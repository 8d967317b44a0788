from timm_remem.cli import main

raise SystemExit(main())
