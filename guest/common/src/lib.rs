//! Shared guest library: ports, markers, /state.
