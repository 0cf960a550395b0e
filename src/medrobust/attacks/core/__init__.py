"""The engine every attack is built on: threat model, session, batches, tracking, objectives, base class."""
