"""Provisioning of tiled clusters with Ansible: the ``tiled-provision`` command."""
