//! stub
use crate::error::Result;
/// Options.
#[derive(Clone, Debug, Default)]
pub struct CheckOptions {}
/// Row.
#[derive(Clone, Debug)]
pub struct CheckRow {}
/// Report.
#[derive(Clone, Debug)]
pub struct CheckReport {}
/// Run.
pub fn run_check(_o: &CheckOptions) -> Result<CheckReport> { Err(crate::error::Error::invalid("x","y")) }
