"""``python -m lm_plugin.latency --listen HOST:PORT``: run a measurement worker (:mod:`lm_plugin.latency.worker`)."""

from .worker import main

main()
