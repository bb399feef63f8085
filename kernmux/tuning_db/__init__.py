"""Tuning database: SQLAlchemy models, alembic migrations, store API, benchmark protocol, tuner."""
