"""shmmmu: the KVM x86 TDP MMU with parallel page faults, emulated by processes sharing one region."""
__version__ = "0.1.0"
