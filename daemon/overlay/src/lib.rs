//! Sans-IO WireGuard overlay core (pure: no sockets, no clock).
