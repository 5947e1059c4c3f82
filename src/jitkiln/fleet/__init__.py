"""The fleet: every instance compiled once per fleet of machines.

* :mod:`.store`: :class:`FleetStore`, the local store wrapped with remote caches;
* :mod:`.remotes`: the shared-directory and Redis remotes;
* :mod:`.signing`: ed25519 keys, signatures and trust;
* :mod:`.bundle`: signed bundles (``prebuild`` / ``seed``);
* :mod:`.ray`: compiling on a Ray cluster;
* :mod:`.config`: the fleet store the environment configures; :mod:`.cli`: its commands.
"""
