from fastsam.bench.cli import main

raise SystemExit(main())
