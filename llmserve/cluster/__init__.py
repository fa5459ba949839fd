"""Past one process: engine replicas on Ray behind one interface, and the router that places
requests on them (identity-free: privacy/routing.py)."""
