from pytest_h2o.cli.main import main

raise SystemExit(main())
