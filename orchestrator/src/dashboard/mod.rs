//! The admin dashboard's HTML: pure functions from view models ([`model`]) to complete HTML5
//! documents ([`maud::Markup`]), all through one [`layout`].
//!
//! Pages: [`login`], [`overview`], [`saga_list`], [`saga_detail`], [`confirm`],
//! [`dead_letters`], [`audit`] and [`error`]. The charts ([`charts`]) and the state-machine
//! diagram ([`diagram`]) are SVG drawn here, and the page's stylesheet and live-update script
//! are static strings of this module: a page loads nothing from anywhere else.
//!
//! Must never: read a database, a clock or a request (the handlers fill the view models and say
//! what `now` is); put data into the page unescaped (maud escapes every splice; `PreEscaped` is
//! used only on this module's own constant CSS and script); render an action form for a viewer
//! (only the logout form is a POST a viewer sees); render a POST form without the `csrf` field.

pub mod charts;
pub mod diagram;
pub mod layout;
pub mod model;
mod overview;
mod pages;
mod sagas;

pub use layout::{CSS, DEV_WARNING, Frame, SCRIPT, Section, layout};
pub use overview::overview;
pub use pages::{audit, confirm, dead_letters, error, login};
pub use sagas::{saga_detail, saga_list};

#[cfg(test)]
mod tests;
