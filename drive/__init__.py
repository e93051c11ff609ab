"""The read side: recovery points as block sources and as disk images in several formats."""
