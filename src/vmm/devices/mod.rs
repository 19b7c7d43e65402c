//! The devices on the port-I/O bus: the UART (and the console behind it)
//! and the exit port. The hypercall port is the hypercall module's.

pub mod bus;
pub mod console;
pub mod exit_port;
pub mod serial;

pub use bus::{DeviceError, PioBus, PioDevice};
pub use console::{ConsoleBuffer, ConsoleError, ConsoleOut};
pub use exit_port::ExitPort;
pub use serial::{SerialDevice, SerialError};
