"""The process: settings, logging, metrics, the master and its workers, embedded services, systemd."""
