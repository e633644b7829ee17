"""The trio-jobs daemons (queen, hive, worker), the ``trio-jobs`` CLI and the demo."""
