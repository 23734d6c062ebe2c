"""Persistence: SQLAlchemy Core tables, repositories implementing domain ports, the unit of work."""
