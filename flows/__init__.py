"""One module per image operation; each flow reads as the list of steps it performs."""

from flows import heartbeat as _heartbeat

_heartbeat.install()  # every process that runs our flows imports this package first
