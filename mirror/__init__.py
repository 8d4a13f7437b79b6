"""The service-mirror controller: Link handling, mirror Services of a linked cluster's
exported Services, and the link / unlink / check commands."""
