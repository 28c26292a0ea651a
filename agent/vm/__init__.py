"""`pilotfish vm install|uninstall|status`: pilotfish as the mesh sidecar of a VM (docs/vm.md).

`vmfiles` reads and checks Istio's VM files, `layout` says where each part goes and what a
manifest holds, `install` is the shell that changes the system, `health` judges what `status`
gathers. The unit they install is deploy/vm/pilotfish.service (shipped here as package data).
"""
