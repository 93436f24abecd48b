//! Markers of recovery (constructors are added with the code that prints them).
