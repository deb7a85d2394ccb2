//! `strftime_now(format)` for chat templates (Llama 3.x prints today's date into its system prompt):
//! Python's `datetime.now().strftime(format)` for the common directives, in UTC.

use std::time::{SystemTime, UNIX_EPOCH};

const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// A calendar date and time of day (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DateTime {
    pub year: i64,
    /// 1..=12
    pub month: u32,
    /// 1..=31
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    /// 0 = Monday .. 6 = Sunday, as Python's `weekday()`.
    pub weekday: u32,
    /// 1..=366
    pub day_of_year: u32,
}

impl DateTime {
    /// The UTC date and time `seconds` after the Unix epoch.
    pub fn from_unix_seconds(seconds: i64) -> Self {
        let days = seconds.div_euclid(86_400);
        let second_of_day = seconds.rem_euclid(86_400) as u32;
        let (year, month, day) = civil_from_days(days);
        let day_of_year = (days - days_from_civil(year, 1, 1)) as u32 + 1;
        DateTime {
            year,
            month,
            day,
            hour: second_of_day / 3600,
            minute: second_of_day / 60 % 60,
            second: second_of_day % 60,
            // 1970-01-01 was a Thursday (weekday 3).
            weekday: (days + 3).rem_euclid(7) as u32,
            day_of_year,
        }
    }

    /// Formats with Python's `strftime` directives; `%-d`-style flags drop zero padding as glibc does.
    pub fn format(&self, format: &str) -> String {
        let mut out = String::new();
        let mut chars = format.chars().peekable();
        while let Some(ch) = chars.next() {
            if ch != '%' {
                out.push(ch);
                continue;
            }
            let unpadded = chars.peek() == Some(&'-');
            if unpadded {
                chars.next();
            }
            let Some(directive) = chars.next() else {
                out.push('%');
                break;
            };
            let number = |value: i64, width: usize| {
                if unpadded {
                    value.to_string()
                } else {
                    format!("{value:0width$}")
                }
            };
            let hour12 = match self.hour % 12 {
                0 => 12,
                h => h,
            };
            let text = match directive {
                'a' => WEEKDAYS[self.weekday as usize][..3].to_string(),
                'A' => WEEKDAYS[self.weekday as usize].to_string(),
                'b' | 'h' => MONTHS[self.month as usize - 1][..3].to_string(),
                'B' => MONTHS[self.month as usize - 1].to_string(),
                'd' => number(self.day.into(), 2),
                'e' => format!("{:>2}", self.day),
                'm' => number(self.month.into(), 2),
                'y' => number(self.year.rem_euclid(100), 2),
                'Y' => self.year.to_string(),
                'H' => number(self.hour.into(), 2),
                'I' => number(hour12.into(), 2),
                'M' => number(self.minute.into(), 2),
                'S' => number(self.second.into(), 2),
                'p' => if self.hour < 12 { "AM" } else { "PM" }.to_string(),
                'j' => number(self.day_of_year.into(), 3),
                'w' => ((self.weekday + 1) % 7).to_string(),
                'u' => (self.weekday + 1).to_string(),
                'F' => format!("{}-{:02}-{:02}", self.year, self.month, self.day),
                'T' => format!("{:02}:{:02}:{:02}", self.hour, self.minute, self.second),
                'z' | 'Z' => String::new(),
                '%' => "%".to_string(),
                other => format!("%{}{other}", if unpadded { "-" } else { "" }),
            };
            out.push_str(&text);
        }
        out
    }
}

/// `datetime.now().strftime(format)`, with the current time in UTC.
pub(crate) fn strftime_now(format: &str) -> String {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs() as i64)
        .unwrap_or(0);
    DateTime::from_unix_seconds(seconds).format(format)
}

/// Days since 1970-01-01 to (year, month, day), Howard Hinnant's `civil_from_days`.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// (year, month, day) to days since 1970-01-01, Howard Hinnant's `days_from_civil`.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let month = i64::from(month);
    let day_of_year =
        (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_a_known_instant() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let time = DateTime::from_unix_seconds(1_709_211_909);
        assert_eq!(time.format("%d %b %Y"), "29 Feb 2024");
        assert_eq!(
            time.format("%A %B %-d, %H:%M:%S %p %I"),
            "Thursday February 29, 13:05:09 PM 01"
        );
        assert_eq!(time.format("%Y-%m-%d %j %%"), "2024-02-29 060 %");
    }

    #[test]
    fn epoch_and_day_round_trip() {
        assert_eq!(
            DateTime::from_unix_seconds(0).format("%F %a"),
            "1970-01-01 Thu"
        );
        for days in [-1_000_000, -1, 0, 59, 10_956, 19_782, 2_000_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn now_has_a_four_digit_year() {
        assert_eq!(strftime_now("%Y").len(), 4);
    }
}
