"""The cluster rehearsal: real containers (podman), object storage (SeaweedFS), a tracking server
(``mlflow server`` with S3 artifacts) and KServe's storage initializer, all on this machine.

Test fixtures that prove the compiled pods run as a cluster runs them; on a cluster Argo, KFP and
KServe stay the engines.
"""
