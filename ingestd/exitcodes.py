"""The process's exit codes, as the README's "Signals and exit codes" lists them.

* ``0``: clean shutdown (drained, or the grace period ran out: unfinished
  files stay in ``.processing``).
* :data:`EXIT_INTERNAL` (1): an unexpected error stopped the server.
* :data:`EXIT_CONFIG` (2): configuration error: a missing or invalid setting,
  an unusable ``APP_AUTOSTART_SESSION``, or an HTTP port that cannot be bound.
* :data:`EXIT_AUTH` (3): no usable Azure credential: at startup, or storage
  rejected the credential for ``APP_AUTH_FAILURE_EXIT_S`` at runtime.

A module of its own, importing nothing, so that :mod:`ingestd.cli`,
:mod:`ingestd.server` and :mod:`ingestd.supervisor` can all use the codes
without importing each other.
"""

EXIT_INTERNAL = 1
EXIT_CONFIG = 2
EXIT_AUTH = 3
