"""``python -m anomaly_service.cli``: the ``anomaly`` command without its console script."""

from . import main

main()
