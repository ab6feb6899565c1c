"""The ``h2o-gate`` command line (:mod:`pytest_h2o.cli.main`); the pytest plugin does not import it."""
