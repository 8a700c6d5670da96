"""Parallelism: logical axis names, meshes, and logical->mesh rules."""
