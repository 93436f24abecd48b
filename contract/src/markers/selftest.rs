//! Markers of selftest (constructors are added with the code that prints them).
