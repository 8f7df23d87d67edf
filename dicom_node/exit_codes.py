"""The exit statuses of the ``dicom-node`` commands."""

EXIT_START_FAILED = 1  # a part could not start: a model, the storage root, a port
EXIT_CONFIG_ERROR = 2  # the configuration or the command line cannot be used
EXIT_FORCED = 130  # stopped by a second signal before the jobs in hand finished
