"""Ray shells around the engine: worker actors, the client-side coordinator, cluster launch."""
