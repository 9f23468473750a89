"""The revisions, oldest first; a package so they ship with cjm."""
