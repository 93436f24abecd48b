//! Markers of bootctld (constructors are added with the code that prints them).
