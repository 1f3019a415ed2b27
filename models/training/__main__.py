from models.training.cli import main

raise SystemExit(main())
