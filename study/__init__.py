"""The accuracy study: every arm (baseline, offline and online PKD, controls) over several seeds on one data set
and one teacher, aggregated into ``metrics/study.json`` and a plot. Run with ``python -m study.run``."""
