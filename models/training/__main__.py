from pallas_ops.host import quiet_libtpu_off_tpu

quiet_libtpu_off_tpu()   # before jax starts a backend: no libtpu start-up errors off TPU

from models.training.cli import main  # noqa: E402

raise SystemExit(main())
