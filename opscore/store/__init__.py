"""Persistence: the schema, the migrations, the group-commit writer and every query."""
