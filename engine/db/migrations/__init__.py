"""Alembic's migration environment; a package so the migrations ship with cjm."""
