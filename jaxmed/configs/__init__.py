"""Experiment configs shipped with jaxmed: ``--config <name>[:arg]`` or
``jaxmed.config.load_config("<name>[:arg]")``; each file defines ``get_config(arg)``."""
