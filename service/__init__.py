"""AgentPRM Serve: the HTTP service (service.api) over the scoring engine (service.engine)."""
