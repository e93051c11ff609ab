"""What happens to a batch: Ray-free stage classes, their Arrow schemas, and the sources.

Stages never know whether they run on a thread or inside a Ray actor. May import catalog.
"""
