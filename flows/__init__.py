"""One module per image operation; each flow reads as the list of steps it performs.

Importing this package changes nothing in Prefect: the heartbeat change (flows/heartbeat.py) is
installed by flows/launcher.py only in processes that run flows."""
