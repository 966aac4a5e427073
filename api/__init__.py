"""The image API: the one front door tenants talk to (FastAPI). It authenticates every request
from its bearer token, lets the catalog decide what is allowed, streams bytes in and out, answers
byte-less operations itself and starts a flow run for every operation that moves bytes."""
