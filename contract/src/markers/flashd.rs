//! Markers of flashd (constructors are added with the code that prints them).
