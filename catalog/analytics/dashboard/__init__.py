"""One layer of the repository package: the map and the import rules are in catalog/__init__.py."""
