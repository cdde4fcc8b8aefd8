pub mod oci;
pub mod store;
pub mod upstream;
