//! Markers of reset (constructors are added with the code that prints them).
